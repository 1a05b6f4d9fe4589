"""HTTP routes, one module per concern; ``edgerun.server.create_app`` assembles them."""
