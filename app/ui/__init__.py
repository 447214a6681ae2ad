"""The web dashboard: static files served at /ui."""
