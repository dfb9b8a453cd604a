"""The auth service: users, teams, memberships, personal access tokens, introspection."""
