#!/bin/sh
# SSH_ASKPASS helper for deploy/README.md: OpenSSH runs it with the password prompt as its
# argument, and it answers with the agent's OIDC token from $GUARITA_TOKEN. (With guarita
# installed, `bastion-askpass` does the same and also reads $GUARITA_TOKEN_FILE.)
printf '%s\n' "$GUARITA_TOKEN"
