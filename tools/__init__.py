"""Maintenance scripts of the repository (data fetching, demo model training and evaluation); not installed."""
