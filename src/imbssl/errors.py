"""The base of imbssl's own errors: failures whose message is written for the user (the CLI prints it as is)."""


class ImbsslError(Exception):
    """A run or command that cannot go on as asked; the message names the file, key or folder and the problem."""
