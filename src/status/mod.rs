//! Where everything stands: the [`report`] behind `dwh-helper status` and
//! `GET /status`, the [`lag`] loop behind the lag gauges and the watchdog, and
//! the watchdog's rule ([`stall`]). Both read the
//! sources of truth (the offsets stored in the DWH, the broker's watermarks) and
//! what the running roles report; they sit above the roles and below the CLI and
//! the API.

pub mod lag;
pub mod report;
pub mod stall;
