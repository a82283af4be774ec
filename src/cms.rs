//! CMS SignedData (RFC 5652, "PKCS#7"), attached content, DER: what `[web] sign_profiles`
//! wraps an Apple configuration profile in, so that iOS and macOS show it as verified.
//!
//! The structures are RustCrypto's `cms` types (DER encoding only, no builder: its builder
//! wants RustCrypto signers); the signature over the signed attributes is made by the
//! TLS key in service through rustls' [`SigningKey`] (aws-lc-rs underneath), so every key
//! type the listeners load signs here too: ECDSA P-256/P-384/P-521, RSA (PKCS#1 v1.5 with
//! SHA-256) and Ed25519 (RFC 8419). The signer is named by issuer and serial number, and
//! the whole chain as loaded goes into `certificates`. No protocol knowledge.

use cms::cert::{CertificateChoices, IssuerAndSerialNumber};
use cms::content_info::{CmsVersion, ContentInfo};
use cms::signed_data::{
    CertificateSet, EncapsulatedContentInfo, SignedData, SignerIdentifier, SignerInfo, SignerInfos,
};
use rustls::SignatureScheme;
use rustls::pki_types::CertificateDer;
use rustls::sign::SigningKey;
use x509_cert::attr::Attribute;
use x509_cert::der::asn1::{OctetString, SetOfVec};
use x509_cert::der::oid::ObjectIdentifier;
use x509_cert::der::{Any, Decode as _, Encode as _};
use x509_cert::spki::AlgorithmIdentifierOwned;

/// Why a profile could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum CmsError {
    /// The chain is empty.
    #[error("no certificate to sign with")]
    NoCertificate,
    /// The key offers none of the signature schemes CMS is written for here.
    #[error("the key's type cannot sign a CMS message (ECDSA, RSA or Ed25519 needed)")]
    UnsupportedKey,
    /// A certificate did not parse, or a structure did not encode.
    #[error("encoding: {0}")]
    Der(#[from] x509_cert::der::Error),
    /// The key refused to sign.
    #[error("signing: {0}")]
    Sign(#[from] rustls::Error),
}

const ID_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const ID_CONTENT_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.3");
const ID_MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
const SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
const SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.3");
const ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const ECDSA_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.4");
const RSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

/// The schemes tried, in this order; each with its digest and signature algorithm. The
/// digest is the one the scheme hashes with, since verifiers (OpenSSL) hash the signed
/// attributes with the SignerInfo's digest algorithm.
const SCHEMES: [(SignatureScheme, ObjectIdentifier, ObjectIdentifier); 5] = [
    (SignatureScheme::ECDSA_NISTP256_SHA256, SHA256, ECDSA_SHA256),
    (SignatureScheme::ECDSA_NISTP384_SHA384, SHA384, ECDSA_SHA384),
    (SignatureScheme::ECDSA_NISTP521_SHA512, SHA512, ECDSA_SHA512),
    (SignatureScheme::RSA_PKCS1_SHA256, SHA256, RSA_SHA256),
    // RFC 8419: Ed25519 with SHA-512 as the message digest.
    (SignatureScheme::ED25519, SHA512, ED25519),
];

fn digest(alg: ObjectIdentifier, data: &[u8]) -> Vec<u8> {
    let alg = match alg {
        SHA384 => &aws_lc_rs::digest::SHA384,
        SHA512 => &aws_lc_rs::digest::SHA512,
        _ => &aws_lc_rs::digest::SHA256,
    };
    aws_lc_rs::digest::digest(alg, data).as_ref().to_vec()
}

/// An AlgorithmIdentifier; `null`: with a NULL parameter (RSA, RFC 4055), else without
/// parameters (the SHA-2 digests, RFC 5754; ECDSA; Ed25519).
fn algorithm(oid: ObjectIdentifier, null: bool) -> AlgorithmIdentifierOwned {
    AlgorithmIdentifierOwned { oid, parameters: null.then(Any::null) }
}

fn attribute(oid: ObjectIdentifier, value: Any) -> Result<Attribute, CmsError> {
    Ok(Attribute { oid, values: SetOfVec::try_from(vec![value])? })
}

/// `content` in a CMS SignedData (DER) signed by `key`, the key of `chain[0]`, with the
/// signed attributes content-type and message-digest and every certificate of `chain`.
pub fn sign_attached(chain: &[CertificateDer<'_>], key: &dyn SigningKey, content: &[u8]) -> Result<Vec<u8>, CmsError> {
    let leaf = chain.first().ok_or(CmsError::NoCertificate)?;
    let offered: Vec<SignatureScheme> = SCHEMES.iter().map(|(s, _, _)| *s).collect();
    let signer = key.choose_scheme(&offered).ok_or(CmsError::UnsupportedKey)?;
    let (_, digest_oid, sig_oid) =
        SCHEMES.iter().find(|(s, _, _)| *s == signer.scheme()).copied().ok_or(CmsError::UnsupportedKey)?;
    let certs = chain.iter().map(|c| x509_cert::Certificate::from_der(c.as_ref())).collect::<Result<Vec<_>, _>>()?;
    let leaf_cert = x509_cert::Certificate::from_der(leaf.as_ref())?;
    let tbs = leaf_cert.tbs_certificate;

    let signed_attrs = SetOfVec::try_from(vec![
        attribute(ID_CONTENT_TYPE, Any::encode_from(&ID_DATA)?)?,
        attribute(ID_MESSAGE_DIGEST, Any::encode_from(&OctetString::new(digest(digest_oid, content))?)?)?,
    ])?;
    // The signature covers the attributes' DER as a SET (RFC 5652 §5.4), not the
    // [0] IMPLICIT form they take inside SignerInfo.
    let signature = signer.sign(&signed_attrs.to_der()?)?;
    let rsa = sig_oid == RSA_SHA256;
    let signer_info = SignerInfo {
        version: CmsVersion::V1,
        sid: SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
            issuer: tbs.issuer,
            serial_number: tbs.serial_number,
        }),
        digest_alg: algorithm(digest_oid, false),
        signed_attrs: Some(signed_attrs),
        signature_algorithm: algorithm(sig_oid, rsa),
        signature: OctetString::new(signature)?,
        unsigned_attrs: None,
    };
    let signed = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: SetOfVec::try_from(vec![signer_info.digest_alg.clone()])?,
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: ID_DATA,
            econtent: Some(Any::encode_from(&OctetString::new(content)?)?),
        },
        certificates: Some(CertificateSet(SetOfVec::try_from(
            certs.into_iter().map(CertificateChoices::Certificate).collect::<Vec<_>>(),
        )?)),
        crls: None,
        signer_infos: SignerInfos(SetOfVec::try_from(vec![signer_info])?),
    };
    let info = ContentInfo { content_type: ID_SIGNED_DATA, content: Any::encode_from(&signed)? };
    Ok(info.to_der()?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rustls::pki_types::PrivateKeyDer;

    /// Signs with a fresh key of `alg` and checks the signature over the signed
    /// attributes with aws-lc-rs, and the message digest and content inside.
    fn round_trip(
        alg: &'static rcgen::SignatureAlgorithm,
        verify: &'static dyn aws_lc_rs::signature::VerificationAlgorithm,
    ) {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["mail.example.test".into()]).unwrap().self_signed(&key).unwrap();
        let der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let signing = rustls::crypto::aws_lc_rs::default_provider().key_provider.load_private_key(der).unwrap();
        let content = b"<plist>profile</plist>";
        let out = sign_attached(&[cert.der().clone()], signing.as_ref(), content).unwrap();

        let info = ContentInfo::from_der(&out).unwrap();
        assert_eq!(info.content_type, ID_SIGNED_DATA);
        let sd: SignedData = info.content.decode_as().unwrap();
        let inner: OctetString = sd.encap_content_info.econtent.unwrap().decode_as().unwrap();
        assert_eq!(inner.as_bytes(), content);
        assert_eq!(sd.certificates.unwrap().0.len(), 1);
        let si = sd.signer_infos.0.get(0).unwrap();
        let attrs = si.signed_attrs.clone().unwrap();
        let md = attrs.iter().find(|a| a.oid == ID_MESSAGE_DIGEST).unwrap();
        let md: OctetString = md.values.get(0).unwrap().decode_as().unwrap();
        assert_eq!(md.as_bytes(), digest(si.digest_alg.oid, content));
        let public = aws_lc_rs::signature::UnparsedPublicKey::new(verify, key.public_key_raw());
        public.verify(&attrs.to_der().unwrap(), si.signature.as_bytes()).unwrap();
    }

    #[test]
    fn ecdsa_p256_and_p384_keys_sign() {
        round_trip(&rcgen::PKCS_ECDSA_P256_SHA256, &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1);
        round_trip(&rcgen::PKCS_ECDSA_P384_SHA384, &aws_lc_rs::signature::ECDSA_P384_SHA384_ASN1);
    }

    #[test]
    fn rsa_keys_sign_with_pkcs1_sha256() {
        round_trip(&rcgen::PKCS_RSA_SHA256, &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256);
    }

    #[test]
    fn ed25519_keys_sign() {
        round_trip(&rcgen::PKCS_ED25519, &aws_lc_rs::signature::ED25519);
    }

    #[test]
    fn an_empty_chain_is_an_error() {
        let key = rcgen::KeyPair::generate().unwrap();
        let der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let signing = rustls::crypto::aws_lc_rs::default_provider().key_provider.load_private_key(der).unwrap();
        assert!(matches!(sign_attached(&[], signing.as_ref(), b"x"), Err(CmsError::NoCertificate)));
    }
}
