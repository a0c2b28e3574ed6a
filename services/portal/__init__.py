"""The web portal: balance, usage, transactions, receipts, budgets, invoices, keys and credit
for an org's people, server-rendered, over the other services' gRPC contracts."""
