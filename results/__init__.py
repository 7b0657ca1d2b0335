"""Result records and tables."""
