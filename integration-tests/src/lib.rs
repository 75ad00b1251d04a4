//! cohort-integration-tests
