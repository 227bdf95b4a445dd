#!/bin/sh
# Initialise the SoftHSM2 token named by KEYLEDGER_HSM_TOKEN on first start (once,
# under a lock: every KeyLedger container shares the token volume), then run the
# command. The user PIN comes from KEYLEDGER_HSM_PIN (compose reads it from .env);
# the SO PIN is random and discarded, as for KeyLedger's embedded token.
set -eu
if [ "${KEYLEDGER_PKCS11_MODULE:-}" = /usr/lib/softhsm/libsofthsm2.so ]; then
    : "${KEYLEDGER_HSM_PIN:?KEYLEDGER_HSM_PIN is required}"
    label="${KEYLEDGER_HSM_TOKEN:-keyledger}"
    (
        flock 9
        if ! softhsm2-util --show-slots | grep -q "Label:[[:space:]]*${label}[[:space:]]*$"; then
            so_pin="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
            softhsm2-util --init-token --free --label "$label" \
                --pin "$KEYLEDGER_HSM_PIN" --so-pin "$so_pin" >/dev/null
        fi
    ) 9>/var/lib/keyledger-hsm/.init.lock
fi
exec "$@"
