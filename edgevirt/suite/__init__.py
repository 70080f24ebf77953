"""YAML test suites: :mod:`.model` (parse and validate), :mod:`.runner`, :mod:`.junit`."""
