"""The edgefarm coordinator: campaigns, scheduling, leases and result intake."""
