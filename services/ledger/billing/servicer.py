"""BillingService over gRPC: proto in, domain call, proto out — nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Final

import grpc

from services.ledger import convert
from services.ledger.billing import convert as bill_convert
from services.ledger.billing import pdf, statement_pdf
from services.ledger.billing.service import Billing
from services.ledger.servicer import _actor
from tally.ledger.v1 import billing_pb2 as pb
from tally.ledger.v1 import billing_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
PDF_CHUNK_BYTES: Final = 64 * 1024


class BillingServicer(billing_pb2_grpc.BillingServiceServicer):
    """Translates BillingService calls to Billing operations."""

    def __init__(self, billing: Billing) -> None:
        self.billing = billing

    async def SetBillingProfile(self, request: pb.SetBillingProfileRequest, context: Context
                                ) -> pb.SetBillingProfileResponse:
        profile = await self.billing.set_profile(
            request.request_id, bill_convert.profile_in(request.profile),
            convert.caller(request.context, _actor()))
        return pb.SetBillingProfileResponse(profile=bill_convert.profile_out(profile))

    async def GetBillingProfile(self, request: pb.GetBillingProfileRequest, context: Context
                                ) -> pb.GetBillingProfileResponse:
        profile = await self.billing.store.get_profile(request.org_id)
        return pb.GetBillingProfileResponse(profile=bill_convert.profile_out(profile))

    async def DeleteBillingProfile(self, request: pb.DeleteBillingProfileRequest,
                                   context: Context) -> pb.DeleteBillingProfileResponse:
        await self.billing.delete_profile(request.request_id, request.org_id,
                                          convert.caller(request.context, _actor()))
        return pb.DeleteBillingProfileResponse()

    async def SetBillingSettings(self, request: pb.SetBillingSettingsRequest, context: Context
                                 ) -> pb.SetBillingSettingsResponse:
        settings = await self.billing.set_settings(
            request.request_id, bill_convert.settings_in(request.settings),
            convert.caller(request.context, _actor()))
        return pb.SetBillingSettingsResponse(settings=bill_convert.settings_out(settings))

    async def GetBillingSettings(self, request: pb.GetBillingSettingsRequest, context: Context
                                 ) -> pb.GetBillingSettingsResponse:
        settings = await self.billing.store.get_settings(request.org_id)
        return pb.GetBillingSettingsResponse(settings=bill_convert.settings_out(settings))

    async def GetTaxSnapshot(self, request: pb.GetTaxSnapshotRequest, context: Context
                             ) -> pb.GetTaxSnapshotResponse:
        taken = await self.billing.store.tax_of(request.org_id, request.payment_order_id)
        return pb.GetTaxSnapshotResponse(
            tax=bill_convert.tax_out(request.payment_order_id, taken))

    async def PublishTaxRates(self, request: pb.PublishTaxRatesRequest, context: Context
                              ) -> pb.PublishTaxRatesResponse:
        table = await self.billing.publish_rates(
            request.request_id, dict(request.table.rates_ppm),
            bill_convert.effective_from(request.table), convert.caller(request.context, _actor()))
        return pb.PublishTaxRatesResponse(table=bill_convert.table_out(table))

    async def GetTaxRates(self, request: pb.GetTaxRatesRequest, context: Context
                          ) -> pb.GetTaxRatesResponse:
        table = await self.billing.store.rate_table(request.version)
        return pb.GetTaxRatesResponse(table=bill_convert.table_out(table))

    async def GetInvoice(self, request: pb.GetInvoiceRequest, context: Context
                         ) -> pb.GetInvoiceResponse:
        doc = await self.billing.store.get_document(request.org_id, request.invoice_id)
        return pb.GetInvoiceResponse(invoice=bill_convert.document_out(doc))

    async def ListInvoices(self, request: pb.ListInvoicesRequest, context: Context
                           ) -> pb.ListInvoicesResponse:
        found, token = await self.billing.store.list_documents(
            request.org_id, size=request.page_size, token=request.page_token)
        return pb.ListInvoicesResponse(invoices=[bill_convert.document_out(x) for x in found],
                                       next_page_token=token)

    async def DownloadInvoicePdf(self, request: pb.DownloadInvoicePdfRequest, context: Context
                                 ) -> AsyncIterator[pb.DownloadInvoicePdfResponse]:
        doc = await self.billing.store.get_document(request.org_id, request.invoice_id)
        rendered = await asyncio.to_thread(pdf.render, doc)
        for start in range(0, len(rendered), PDF_CHUNK_BYTES):
            yield pb.DownloadInvoicePdfResponse(
                chunk=rendered[start:start + PDF_CHUNK_BYTES],
                file_name=f"{doc.document_id}.pdf" if start == 0 else "")

    async def GetStatement(self, request: pb.GetStatementRequest, context: Context
                           ) -> pb.GetStatementResponse:
        found = await self.billing.statements.statement(request.org_id, request.month)
        return pb.GetStatementResponse(statement=bill_convert.statement_out(found))

    async def ListStatements(self, request: pb.ListStatementsRequest, context: Context
                             ) -> pb.ListStatementsResponse:
        found, token = await self.billing.statements.list_statements(
            request.org_id, request.page_size, request.page_token)
        return pb.ListStatementsResponse(
            statements=[bill_convert.statement_out(x) for x in found], next_page_token=token)

    async def DownloadStatementPdf(self, request: pb.DownloadStatementPdfRequest,
                                   context: Context
                                   ) -> AsyncIterator[pb.DownloadStatementPdfResponse]:
        found = await self.billing.statements.statement(request.org_id, request.month)
        rendered = await asyncio.to_thread(statement_pdf.render, found,
                                           self.billing.store.issuer)
        for start in range(0, len(rendered), PDF_CHUNK_BYTES):
            yield pb.DownloadStatementPdfResponse(
                chunk=rendered[start:start + PDF_CHUNK_BYTES],
                file_name=statement_pdf.file_name(found) if start == 0 else "")

    async def ListDailySnapshots(self, request: pb.ListDailySnapshotsRequest,
                                 context: Context) -> pb.ListDailySnapshotsResponse:
        found = await self.billing.statements.snapshots(request.org_id, request.from_day,
                                                        request.to_day)
        return pb.ListDailySnapshotsResponse(
            snapshots=[bill_convert.snapshot_out(x) for x in found])

    async def Reconcile(self, request: pb.ReconcileRequest, context: Context
                        ) -> pb.ReconcileResponse:
        found = await self.billing.reconcile(request.org_id, request.month)
        return bill_convert.reconciliation_out(request.month, found)
