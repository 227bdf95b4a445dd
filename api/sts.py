"""AWS Query protocol for STS ``GetCallerIdentity`` on the KMS endpoint.

Tools (the AWS CLI's ``aws sts get-caller-identity``, Terraform, the SDKs' credential
checks) call it to find out who they are; pointed at KeyLedger's endpoint they get the
principal KeyLedger authenticated. Requests are ``POST /`` with a form-urlencoded body
``Action=GetCallerIdentity&Version=2011-06-15``, signed with SigV4 service ``sts``.
Every other action answers ``InvalidAction``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from ledger.errors import (
    AccessDeniedError,
    IncompleteSignatureError,
    InvalidSignatureError,
    KeyLedgerError,
    MissingAuthenticationTokenError,
    UnrecognizedClientError,
    ValidationError,
)

if TYPE_CHECKING:
    from ledger.service import Caller

CONTENT_TYPE = "text/xml"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
SIGNING_SERVICE = "sts"
VERSION = "2011-06-15"
NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"
ACTIONS = frozenset({"GetCallerIdentity"})
_ACCOUNT_IN_ARN = re.compile(r"^arn:aws[a-z-]*:(?:iam|sts)::(\d{12}):")


class InvalidActionError(KeyLedgerError):
    aws_name = "InvalidAction"


#: KeyLedger error -> (STS error code, HTTP status), as STS (a query service) answers.
_STS_ERRORS: tuple[tuple[type[KeyLedgerError], str, int], ...] = (
    (MissingAuthenticationTokenError, "MissingAuthenticationToken", 403),
    (UnrecognizedClientError, "InvalidClientTokenId", 403),
    (InvalidSignatureError, "SignatureDoesNotMatch", 403),
    (IncompleteSignatureError, "IncompleteSignature", 400),
    (AccessDeniedError, "AccessDenied", 403),
    (InvalidActionError, "InvalidAction", 400),
    (ValidationError, "ValidationError", 400),
)


def is_query_request(content_type: str | None) -> bool:
    """True for a form-urlencoded body (the Query protocol), whatever the charset."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == FORM_CONTENT_TYPE


def parse_action(body: bytes) -> str:
    """The STS action a Query request names; raises InvalidActionError for any other.

    Security: the body is parsed only for ``Action``; nothing else is kept.
    """
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise InvalidActionError("The request body is not valid form data.") from None
    actions = form.get("Action", [])
    action = actions[0] if len(actions) == 1 else ""
    if action not in ACTIONS:
        shown = action[:64] if action.isascii() and action.isprintable() else ""
        raise InvalidActionError(
            f"Could not find operation {shown} for version {VERSION}"
            if shown
            else "The request must contain the parameter Action."
        )
    versions = form.get("Version", [VERSION])
    if versions != [VERSION]:
        raise InvalidActionError(f"Could not find operation {action} for version given.")
    return action


def account_of(caller: Caller) -> str:
    if caller.account_id:
        return caller.account_id
    match = _ACCOUNT_IN_ARN.match(caller.principal)
    return match.group(1) if match else ""


def user_id_of(caller: Caller) -> str:
    """STS's UserId. KeyLedger keeps no IAM unique ids: the access key id stands in
    (it identifies the credential as AIDA.../AROA... ids do), else the principal."""
    return caller.access_key_id or caller.principal


def get_caller_identity_body(caller: Caller, request_id: str) -> bytes:
    return (
        f'<GetCallerIdentityResponse xmlns="{NAMESPACE}">'
        "<GetCallerIdentityResult>"
        f"<Arn>{escape(caller.principal)}</Arn>"
        f"<UserId>{escape(user_id_of(caller))}</UserId>"
        f"<Account>{escape(account_of(caller))}</Account>"
        "</GetCallerIdentityResult>"
        f"<ResponseMetadata><RequestId>{escape(request_id)}</RequestId></ResponseMetadata>"
        "</GetCallerIdentityResponse>"
    ).encode()


def error_code_and_status(err: KeyLedgerError) -> tuple[str, int]:
    for cls, code, status in _STS_ERRORS:
        if isinstance(err, cls):
            return code, status
    return "InternalFailure", 500


def error_body(err: KeyLedgerError, request_id: str) -> tuple[int, bytes]:
    """The HTTP status and STS XML error document for ``err``."""
    code, status = error_code_and_status(err)
    kind = "Receiver" if status >= 500 else "Sender"
    message = err.message if status < 500 else "An internal error occurred."
    body = (
        f'<ErrorResponse xmlns="{NAMESPACE}">'
        f"<Error><Type>{kind}</Type><Code>{code}</Code>"
        f"<Message>{escape(message)}</Message></Error>"
        f"<RequestId>{escape(request_id)}</RequestId>"
        "</ErrorResponse>"
    ).encode()
    return status, body


__all__ = [
    "CONTENT_TYPE",
    "SIGNING_SERVICE",
    "InvalidActionError",
    "error_body",
    "get_caller_identity_body",
    "is_query_request",
    "parse_action",
]
