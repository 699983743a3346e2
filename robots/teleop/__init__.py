"""Teleoperation devices: keyboard, SpaceMouse, gamepad, leader arms."""
