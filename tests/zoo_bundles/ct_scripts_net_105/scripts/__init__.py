"""Custom code of the test bundle (as zoo bundles ship theirs)."""
