"""Robots: simulated and real arms behind one interface, teleoperation devices."""
