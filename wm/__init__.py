"""World models and the data layer they train on."""
