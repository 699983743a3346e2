"""Controllers: planners over world models and diffusion policies."""
