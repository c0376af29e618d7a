"""The console and admin API (HTTPS, accounts and roles) for admins, approvers and auditors."""
