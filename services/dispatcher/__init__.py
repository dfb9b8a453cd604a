"""The dispatcher: routes events to webhooks and delivers them as signed POSTs."""
