"""Icons and theme stylesheets of the studio, read with importlib.resources."""
