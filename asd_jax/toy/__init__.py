"""A synthetic world whose data density is known in closed form (shared spec TOY.md)."""
