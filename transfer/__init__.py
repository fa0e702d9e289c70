"""medstream: transfer."""
