"""The planner: cost model, policy search and hardware profiles, above the runtime."""
