"""Data sets and the multi-crop views SSL training draws from them."""
