"""handlers/engines."""
