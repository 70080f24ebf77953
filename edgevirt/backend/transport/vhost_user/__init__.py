"""vhost_user."""
