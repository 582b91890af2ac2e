"""Commands of the analysis stage (registered on the shared app)."""
