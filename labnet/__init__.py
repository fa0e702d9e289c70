"""medstream: labnet."""
