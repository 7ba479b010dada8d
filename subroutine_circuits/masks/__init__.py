"""masks subpackage."""
