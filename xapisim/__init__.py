"""medstream: xapisim."""
