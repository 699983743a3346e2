"""Real robots: arms driven through lerobot's follower robots, behind our `Robot` interface."""
