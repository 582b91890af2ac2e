"""Commands of the difficulty stage (registered on the shared app)."""
