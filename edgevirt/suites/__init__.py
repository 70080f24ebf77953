"""Test suites shipped with edgevirt (YAML package data); see edgevirt.suite.model."""
