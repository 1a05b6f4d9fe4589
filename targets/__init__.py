"""Built-in target profiles (data files), shipped as package data of edgebuild."""
