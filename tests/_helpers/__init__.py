"""Builders shared by test modules that were split along themes (no tests here); their fixtures are in conftest.py."""
