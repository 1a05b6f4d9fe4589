"""What a bundle's task makes of its outputs: one module per task (post-processing and the
``/v1/predict`` answer). The manifest's ``task`` names the module; see :mod:`edgerun.tasks.registry`."""
