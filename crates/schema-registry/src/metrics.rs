//! The schema registry's metrics (HTTP request metrics come from `platform::http`).

use metrics::{describe_counter, describe_gauge};

pub const SUBJECTS: &str = "pulse_schema_registry_subjects";
pub const SCHEMAS: &str = "pulse_schema_registry_schemas";
pub const VERSIONS: &str = "pulse_schema_registry_versions";
/// Registered at zero (`describe`).
pub const COMPATIBILITY_REJECTIONS_TOTAL: &str =
    "pulse_schema_registry_compatibility_rejections_total";
pub const LOG_APPLIED_TOTAL: &str = "pulse_schema_registry_log_records_applied_total";
pub const LOG_OFFSET: &str = "pulse_schema_registry_log_applied_offset";
/// Fact and tombstone records this replica wrote to settle the log, by `kind`.
pub const LOG_SETTLED_TOTAL: &str = "pulse_schema_registry_log_settle_records_total";
pub const LOG_UNSETTLED: &str = "pulse_schema_registry_log_unsettled";
/// Refused requests by `reason` (`auth::Failure::reason`: missing, malformed, unknown_user,
/// wrong_password, forbidden); registered at zero.
pub const AUTH_FAILURES_TOTAL: &str = "pulse_schema_registry_auth_failures_total";
pub const AUTH_USERS: &str = "pulse_schema_registry_auth_users";
/// Requests authenticated, by `user` (the users file's names; never a password).
pub const AUTHENTICATED_TOTAL: &str = "pulse_schema_registry_authenticated_requests_total";
pub const AUTH_RELOADS_TOTAL: &str = "pulse_schema_registry_auth_reloads_total";

pub fn describe() {
    pulse_platform::http::describe_metrics();
    describe_gauge!(SUBJECTS, "Subjects with at least one live version.");
    describe_gauge!(SCHEMAS, "Distinct schemas (ids) known.");
    describe_gauge!(VERSIONS, "Live subject versions.");
    describe_counter!(
        COMPATIBILITY_REJECTIONS_TOTAL,
        "Registrations refused because the schema is incompatible with earlier versions."
    );
    // Registered at zero, so the series exists (and `rate()` sees the first rejection)
    // before any registration was refused.
    metrics::counter!(COMPATIBILITY_REJECTIONS_TOTAL).increment(0);
    describe_counter!(
        LOG_APPLIED_TOTAL,
        "Records of the _schemas log applied by this replica, by outcome."
    );
    describe_counter!(
        AUTHENTICATED_TOTAL,
        "Requests authenticated, by the user's name in the users file (never a password or hash): during a password rotation, shows which users still call."
    );
    describe_counter!(
        AUTH_FAILURES_TOTAL,
        "Requests refused by authentication (401) or authorization (403), by reason."
    );
    describe_gauge!(
        AUTH_USERS,
        "Users in the credentials file currently in force."
    );
    describe_counter!(
        AUTH_RELOADS_TOTAL,
        "Reloads of the credentials file after it changed, by outcome (ok, error)."
    );
    describe_counter!(
        LOG_SETTLED_TOTAL,
        "Records this replica wrote to the _schemas log to settle decided commands, by kind (fact, tombstone)."
    );
    describe_gauge!(
        LOG_UNSETTLED,
        "Keys and commands of the _schemas log not yet settled (compaction cannot drop them yet), as of the last settle tick."
    );
    describe_gauge!(
        LOG_OFFSET,
        "Offset of the last _schemas record this replica applied."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_registry_scrape_has_the_rejection_counter_at_zero() {
        let text = pulse_platform::metrics::scrape_with(describe);
        assert!(
            text.contains(&format!("{COMPATIBILITY_REJECTIONS_TOTAL} 0")),
            "{COMPATIBILITY_REJECTIONS_TOTAL} missing from\n{text}"
        );
    }
}
