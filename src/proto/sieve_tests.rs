//! Session tests for the ManageSieve pre-auth machine: bytes in, bytes and actions out.

use super::*;
