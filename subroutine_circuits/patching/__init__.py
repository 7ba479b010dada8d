"""patching subpackage."""
