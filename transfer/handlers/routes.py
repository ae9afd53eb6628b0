"""Every route of the HTTP API, in one table. GET routes answer HEAD too.

Handlers declare who may call them (`@requires`, `@public`, `@accepts_ticket`: see
auth/middleware.py); the import and the upload append answer `Expect: 100-continue`
themselves, after their checks.
"""

from __future__ import annotations

from aiohttp import web

from transfer.handlers import metrics, records, rpc, session, transfers, users

ROUTES = [
    ("GET", "/health", session.health),
    ("GET", "/ready", session.ready),
    ("GET", "/metrics", metrics.metrics),
    ("GET", "/openapi.json", metrics.openapi),
    ("POST", "/session", session.login),
    ("GET", "/session", session.whoami),
    ("DELETE", "/session", session.logout),
    ("GET", "/users", users.list_users),
    ("GET", "/users/{username}", users.get_user),
    ("POST", "/users", users.add_user),
    ("PATCH", "/users/{username}", users.change_user),
    ("DELETE", "/users/{username}", users.remove_user),
    ("GET", "/hosts", records.list_hosts),
    ("GET", "/hosts/{uuid}", records.get_host),
    ("GET", "/srs", records.list_srs),
    ("GET", "/srs/{uuid}", records.get_sr),
    ("GET", "/vdis", records.list_vdis),
    ("GET", "/vdis/{uuid}", records.get_vdi),
    ("POST", "/vdis", records.create_vdi),
    ("PATCH", "/vdis/{uuid}", records.update_vdi),
    ("DELETE", "/vdis/{uuid}", records.delete_vdi),
    ("GET", "/vdis/{uuid}/changed_blocks", records.changed_blocks),
    ("POST", "/vdis/{uuid}/snapshot", records.snapshot_vdi),
    ("POST", "/vdis/{uuid}/clone", records.clone_vdi),
    ("POST", "/vdis/{uuid}/data_destroy", records.data_destroy_vdi),
    ("GET", "/vdis/{uuid}/extents", transfers.extents),
    ("GET", "/vdis/{uuid}/checksum", transfers.checksum),
    ("GET", "/tasks", records.list_tasks),
    ("GET", "/tasks/{uuid}", records.get_task),
    ("POST", "/tasks", records.create_task),
    ("POST", "/tasks/{uuid}/cancel", records.cancel_task),
    ("DELETE", "/tasks/{uuid}", records.destroy_task),
    # XAPI matches these by prefix: `curl -T disk.raw URL/` appends the file name.
    ("PUT", "/import_raw_vdi", transfers.import_raw_vdi),
    ("PUT", "/import_raw_vdi/{tail:.*}", transfers.import_raw_vdi),
    ("HEAD", "/import_raw_vdi", transfers.upload_status),
    ("HEAD", "/import_raw_vdi/{tail:.*}", transfers.upload_status),
    ("OPTIONS", "/import_raw_vdi", transfers.import_options),
    ("OPTIONS", "/export_raw_vdi", transfers.export_options),
    ("GET", "/export_raw_vdi", transfers.export_raw_vdi),
    ("GET", "/export_raw_vdi/{tail:.*}", transfers.export_raw_vdi),
    # The upload resource of the IETF resumable-upload draft.
    ("HEAD", "/uploads/{task}", transfers.upload_resource_status),
    ("PATCH", "/uploads/{task}", transfers.upload_append),
    ("DELETE", "/uploads/{task}", transfers.upload_cancel),
    # XenAPI: JSON-RPC, and XML-RPC where XAPI and its clients look for it.
    ("POST", "/jsonrpc", rpc.jsonrpc),
    ("POST", "/", rpc.xmlrpc),
    ("POST", "/RPC2", rpc.xmlrpc),
    ("POST", "/xmlrpc", rpc.xmlrpc),
]
ANSWERS_CONTINUE = {transfers.import_raw_vdi, transfers.upload_append}


def add_routes(app: web.Application) -> None:
    """Register ROUTES; handlers that answer 100-continue themselves get no automatic one."""
    for method, path, handler in ROUTES:
        if method == "GET":
            app.router.add_get(path, handler)
        elif handler in ANSWERS_CONTINUE:
            app.router.add_route(
                method, path, handler, expect_handler=transfers.no_automatic_continue
            )
        else:
            app.router.add_route(method, path, handler)
