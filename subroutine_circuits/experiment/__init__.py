"""experiment subpackage."""
