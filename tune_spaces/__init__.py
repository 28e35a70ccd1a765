"""Search spaces as data: YAML files naming each hyperparameter's distribution and range.

The files and their loader arrive with the sweep (issue 4); this package ships them.
"""
