"""SWE-style code environment: task instances, tools (bash, str_replace, finish) and the Env."""
