"""medstream: xenctl."""
