"""The MCP front door (Model Context Protocol): tools for AI agents, each call a session of the
shared pipeline. See docs/mcp.md."""
