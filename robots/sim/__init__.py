"""Simulated tasks (MuJoCo, gym-pusht, robosuite) behind the robot interface."""
