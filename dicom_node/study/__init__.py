"""From spooled instances to a study: completion, headers, series selection, the CT volume."""
