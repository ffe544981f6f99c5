"""The browser editor: an HTTP + server-sent-events gateway to the services, and its page (static/)."""
