"""Networks of the test bundle."""
