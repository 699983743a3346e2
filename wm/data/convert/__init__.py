"""Converters from other demonstration formats (robomimic HDF5, LeRobot) into a DemoStore."""
