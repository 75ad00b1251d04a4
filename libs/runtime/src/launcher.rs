//! Launchers start and stop one coordinator per running job (DESIGN §1).
