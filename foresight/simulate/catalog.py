"""What the simulator can say: every code it emits, in the project's code form and in Synthea's vocabularies.

Pure data, no logic beyond building look-up tables. Each clinical concept carries its MEDS code (ICD-10-CM, ATC,
LOINC, ICD-10-PCS), a description, and the code a Synthea CSV export would use for it (SNOMED CT for conditions
and procedures, RxNorm for medications, LOINC for observations), so one simulated life can be written in either
format. ICD-10-CM and ATC parents are listed explicitly (nearest first) with their titles, so a tokenizer can map a
rare code to a described ancestor.

Condition *bits* are the simulator's chronic state. A bit is evidenced in the record by any code in
:data:`BIT_EVIDENCE` (its own diagnosis code, the history/status code coded at later discharges, an acute
diagnosis that sets it, or a procedure); the oracle rebuilds the state from exactly these codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from foresight.schema import BIRTH_CODE, DEATH_CODE, make_code

# --- chronic state ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """A chronic state bit: how it is coded when diagnosed and at every later discharge."""

    name: str
    icd10: str  # ICD-10-CM, no dot: the code of the diagnosis (or of the history/status, for HX_* bits)
    icd10_desc: str
    snomed: str  # Synthea conditions.csv code
    snomed_desc: str
    note: str  # how a clinician writes it in a note


CONDITIONS: Final[tuple[Condition, ...]] = (
    Condition("OBESITY", "E669", "Obesity, unspecified", "162864005", "Body mass index 30+ - obesity (finding)",
              "obesity"),
    Condition("SMOKER", "F17210", "Nicotine dependence, cigarettes, uncomplicated", "449868002",
              "Smokes tobacco daily (finding)", "tobacco dependence"),
    Condition("HTN", "I10", "Essential (primary) hypertension", "59621000", "Essential hypertension (disorder)",
              "hypertension"),
    Condition("T2D", "E119", "Type 2 diabetes mellitus without complications", "44054006",
              "Diabetes mellitus type 2 (disorder)", "type 2 diabetes mellitus"),
    Condition("CKD", "N189", "Chronic kidney disease, unspecified", "709044004", "Chronic kidney disease (disorder)",
              "chronic kidney disease"),
    Condition("HF", "I509", "Heart failure, unspecified", "84114007", "Heart failure (disorder)", "heart failure"),
    Condition("COPD", "J449", "Chronic obstructive pulmonary disease, unspecified", "13645005",
              "Chronic obstructive lung disease (disorder)", "chronic obstructive pulmonary disease"),
    Condition("ASTHMA", "J45909", "Unspecified asthma, uncomplicated", "195967001", "Asthma (disorder)", "asthma"),
    Condition("DEPRESSION", "F329", "Major depressive disorder, single episode, unspecified", "35489007",
              "Depressive disorder (disorder)", "depression"),
    Condition("AF", "I4891", "Unspecified atrial fibrillation", "49436004", "Atrial fibrillation (disorder)",
              "atrial fibrillation"),
    Condition("CAD", "I2510", "Atherosclerotic heart disease of native coronary artery without angina pectoris",
              "53741008", "Coronary arteriosclerosis (disorder)", "coronary artery disease"),
    Condition("DEMENTIA", "F0390", "Unspecified dementia, unspecified severity, without behavioral disturbance, "
              "psychotic disturbance, mood disturbance, and anxiety", "52448006", "Dementia (disorder)", "dementia"),
    Condition("OSTEOPOROSIS", "M810", "Age-related osteoporosis without current pathological fracture", "64859006",
              "Osteoporosis (disorder)", "osteoporosis"),
    Condition("OA_KNEE", "M179", "Osteoarthritis of knee, unspecified", "239873007",
              "Osteoarthritis of knee (disorder)", "osteoarthritis of the knee"),
    # History and status bits: set by a hospital stay, coded at every later discharge with these codes.
    Condition("HX_MI", "I252", "Old myocardial infarction", "399211009",
              "History of myocardial infarction (situation)", "previous myocardial infarction"),
    Condition("HX_STROKE", "Z8673", "Personal history of transient ischemic attack (TIA), and cerebral infarction "
              "without residual deficits", "230690007", "Stroke", "previous stroke"),
    Condition("HX_HIP_FRACTURE", "Z8781", "Personal history of (healed) traumatic fracture", "359817006",
              "Closed fracture of hip", "previous hip fracture"),
    Condition("KNEE_REPLACED", "Z96651", "Presence of right artificial knee joint", "609588000",
              "Total knee replacement (procedure)", "right knee replacement"),
    Condition("NO_GALLBLADDER", "Z9049", "Acquired absence of other specified parts of digestive tract", "45595009",
              "Laparoscopic cholecystectomy (procedure)", "previous cholecystectomy"),
)
BIT: Final = {c.name: i for i, c in enumerate(CONDITIONS)}
N_BITS: Final = len(CONDITIONS)
# Bits that count as comorbidity in the stay model (in-hospital death): diseases, not risk factors or status.
COMORBIDITY_BITS: Final = tuple(BIT[n] for n in (
    "T2D", "CKD", "HF", "COPD", "AF", "CAD", "DEMENTIA", "HX_MI", "HX_STROKE"))


# --- hospital stays ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Procedure:
    """A procedure done during a stay: ICD-10-PCS in MEDS (coded at discharge), SNOMED in Synthea."""

    pcs: str
    pcs_desc: str
    snomed: str
    snomed_desc: str


@dataclass(frozen=True)
class Cause:
    """The reason for a hospital stay: its principal diagnosis (coded at discharge) and what it leaves behind."""

    name: str
    admit: str  # EMERGENCY or ELECTIVE
    icd10: str
    icd10_desc: str
    snomed: str
    snomed_desc: str
    note: str
    sets: tuple[str, ...] = ()  # condition bits set at discharge
    extra_dx: tuple[str, ...] = ()  # one further ICD-10-CM code of the stay (e.g. the external cause of a fracture)
    procedure: Procedure | None = None
    discharge_rx: tuple[str, ...] = ()  # medication keys started at discharge
    infection: bool = False


_KNEE = Procedure("0SRC0JZ", "Replacement of Right Knee Joint with Synthetic Substitute, Open Approach", "609588000",
                  "Total knee replacement (procedure)")
_PCI = Procedure("02703DZ", "Dilation of Coronary Artery, One Artery with Intraluminal Device, Percutaneous Approach",
                 "415070008", "Percutaneous coronary intervention (procedure)")
_CHOLE = Procedure("0FT44ZZ", "Resection of Gallbladder, Percutaneous Endoscopic Approach", "45595009",
                   "Laparoscopic cholecystectomy (procedure)")
_APPX = Procedure("0DTJ4ZZ", "Resection of Appendix, Percutaneous Endoscopic Approach", "80146002",
                  "Appendectomy (procedure)")
_HERNIA = Procedure("0YQ50ZZ", "Repair Right Inguinal Region, Open Approach", "44558001",
                    "Repair of inguinal hernia (procedure)")

CAUSES: Final[tuple[Cause, ...]] = (
    Cause("PNEUMONIA", "EMERGENCY", "J189", "Pneumonia, unspecified organism", "233604007", "Pneumonia (disorder)",
          "pneumonia", discharge_rx=("AMOXICLAV",), infection=True),
    Cause("INFLUENZA", "EMERGENCY", "J111", "Influenza due to unidentified influenza virus with other respiratory "
          "manifestations", "6142004", "Influenza (disorder)", "influenza", discharge_rx=("OSELTAMIVIR",),
          infection=True),
    Cause("UTI", "EMERGENCY", "N390", "Urinary tract infection, site not specified", "68566005",
          "Urinary tract infectious disease (disorder)", "urinary tract infection", discharge_rx=("NITROFURANTOIN",),
          infection=True),
    Cause("SEPSIS", "EMERGENCY", "A419", "Sepsis, unspecified organism", "91302008", "Sepsis (disorder)", "sepsis",
          discharge_rx=("AMOXICLAV",), infection=True),
    Cause("COPD_EXAC", "EMERGENCY", "J441", "Chronic obstructive pulmonary disease with (acute) exacerbation",
          "195951007", "Acute exacerbation of chronic obstructive airways disease (disorder)",
          "an exacerbation of COPD", discharge_rx=("AZITHROMYCIN",), infection=True),
    Cause("ASTHMA_EXAC", "EMERGENCY", "J45901", "Unspecified asthma with (acute) exacerbation", "708038006",
          "Acute exacerbation of asthma (disorder)", "an asthma exacerbation", discharge_rx=("FLUTICASONE",)),
    Cause("HF_EXAC", "EMERGENCY", "I509", "Heart failure, unspecified", "42343007",
          "Congestive heart failure (disorder)", "decompensated heart failure", discharge_rx=("FUROSEMIDE",)),
    Cause("HF_ONSET", "EMERGENCY", "I509", "Heart failure, unspecified", "84114007", "Heart failure (disorder)",
          "new heart failure", sets=("HF",), discharge_rx=("FUROSEMIDE", "CARVEDILOL")),
    Cause("MI", "EMERGENCY", "I219", "Acute myocardial infarction, unspecified", "22298006",
          "Myocardial infarction (disorder)", "an acute myocardial infarction", sets=("HX_MI", "CAD"),
          discharge_rx=("ASPIRIN", "SIMVASTATIN", "METOPROLOL", "CLOPIDOGREL")),
    Cause("STROKE", "EMERGENCY", "I639", "Cerebral infarction, unspecified", "230690007", "Stroke", "a stroke",
          sets=("HX_STROKE",), discharge_rx=("CLOPIDOGREL", "SIMVASTATIN")),
    Cause("HIP_FRACTURE", "EMERGENCY", "S72009A", "Fracture of unspecified part of neck of unspecified femur, "
          "initial encounter for closed fracture", "359817006", "Closed fracture of hip",
          "a fractured hip after a fall", sets=("HX_HIP_FRACTURE",), extra_dx=("W19XXXA",),
          discharge_rx=("PARACETAMOL",)),
    Cause("AKI", "EMERGENCY", "N179", "Acute kidney failure, unspecified", "14669001",
          "Acute renal failure syndrome (disorder)", "acute kidney injury"),
    Cause("HYPOGLYCEMIA", "EMERGENCY", "E11649", "Type 2 diabetes mellitus with hypoglycemia without coma",
          "302866003", "Hypoglycemia (disorder)", "hypoglycaemia"),
    Cause("GI_BLEED", "EMERGENCY", "K922", "Gastrointestinal hemorrhage, unspecified", "74474003",
          "Gastrointestinal hemorrhage (disorder)", "a gastrointestinal bleed"),
    Cause("CHEST_PAIN", "EMERGENCY", "R079", "Chest pain, unspecified", "29857009", "Chest pain (finding)",
          "chest pain"),
    Cause("CELLULITIS", "EMERGENCY", "L0390", "Cellulitis, unspecified", "128045006", "Cellulitis (disorder)",
          "cellulitis", discharge_rx=("AMOXICLAV",), infection=True),
    Cause("APPENDICITIS", "EMERGENCY", "K3580", "Unspecified acute appendicitis", "74400008", "Appendicitis",
          "acute appendicitis", procedure=_APPX, infection=True),
    Cause("KNEE_REPLACEMENT", "ELECTIVE", "M179", "Osteoarthritis of knee, unspecified", "239873007",
          "Osteoarthritis of knee (disorder)", "an elective knee replacement", sets=("KNEE_REPLACED",),
          procedure=_KNEE, discharge_rx=("PARACETAMOL",)),
    Cause("CAD_PCI", "ELECTIVE", "I2510", "Atherosclerotic heart disease of native coronary artery without angina "
          "pectoris", "53741008", "Coronary arteriosclerosis (disorder)", "elective coronary angioplasty",
          procedure=_PCI, discharge_rx=("CLOPIDOGREL",)),
    Cause("CHOLECYSTECTOMY", "ELECTIVE", "K8020", "Calculus of gallbladder without cholecystitis without "
          "obstruction", "235919008", "Cholelithiasis (disorder)", "an elective cholecystectomy",
          sets=("NO_GALLBLADDER",), procedure=_CHOLE),
    Cause("HERNIA_REPAIR", "ELECTIVE", "K4090", "Unilateral inguinal hernia, without obstruction or gangrene, not "
          "specified as recurrent", "396232000", "Inguinal hernia (disorder)", "an inguinal hernia repair",
          procedure=_HERNIA),
)
CAUSE: Final = {c.name: i for i, c in enumerate(CAUSES)}

# The Synthea encounter for each kind of contact: (ENCOUNTERCLASS, CODE, DESCRIPTION), as Synthea writes them.
SYNTHEA_ENCOUNTER: Final = {
    "routine": ("wellness", "162673000", "General examination of patient (procedure)"),
    "acute": ("ambulatory", "185345009", "Encounter for symptom"),
    "diagnosis": ("ambulatory", "185347001", "Encounter for problem"),
    "EMERGENCY": ("inpatient", "183452005", "Encounter Inpatient"),
    "ELECTIVE": ("inpatient", "32485007", "Hospital admission (procedure)"),
}
SYNTHEA_ICU: Final = ("305351004", "Admission to intensive care unit (procedure)")

DISCHARGES: Final = ("HOME", "HOME_HEALTH_CARE", "SKILLED_NURSING_FACILITY", "DIED")
DISCHARGE_DESC: Final = {
    "HOME": "Discharged home",
    "HOME_HEALTH_CARE": "Discharged home with home health care",
    "SKILLED_NURSING_FACILITY": "Discharged to a skilled nursing facility",
    "DIED": "Died in hospital",
}


# --- primary care -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Acute:
    """A reason for an unplanned primary-care visit (no effect on the chronic state)."""

    name: str
    icd10: str
    icd10_desc: str
    snomed: str
    snomed_desc: str
    note: str
    rx: tuple[tuple[str, float], ...] = ()  # (medication key, probability it is prescribed)
    resolves_days: float = 10.0


ACUTES: Final[tuple[Acute, ...]] = (
    Acute("URTI", "J069", "Acute upper respiratory infection, unspecified", "54150009",
          "Upper respiratory infection (disorder)", "an upper respiratory tract infection", (("AMOXICILLIN", 0.2),)),
    Acute("FLU", "J111", "Influenza due to unidentified influenza virus with other respiratory manifestations",
          "6142004", "Influenza (disorder)", "influenza", (("OSELTAMIVIR", 0.3),)),
    Acute("UTI", "N390", "Urinary tract infection, site not specified", "68566005",
          "Urinary tract infectious disease (disorder)", "a urinary tract infection", (("NITROFURANTOIN", 0.8),)),
    Acute("BRONCHITIS", "J209", "Acute bronchitis, unspecified", "10509002", "Acute bronchitis (disorder)",
          "acute bronchitis", (("AMOXICILLIN", 0.4),)),
    Acute("BACK_PAIN", "M5450", "Low back pain, unspecified", "279039007", "Low back pain (finding)",
          "low back pain", (("IBUPROFEN", 0.5),), resolves_days=30.0),
    Acute("FALL", "W19XXXA", "Unspecified fall, initial encounter", "1912002", "Fall (event)", "a fall",
          (("PARACETAMOL", 0.3),), resolves_days=14.0),
)
ACUTE: Final = {a.name: i for i, a in enumerate(ACUTES)}


# --- medications ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drug:
    """A medication: ATC in MEDS, RxNorm in Synthea; ``chronic`` drugs are started once and never stopped."""

    key: str
    atc: str
    atc_desc: str
    rxnorm: str
    rxnorm_desc: str
    chronic: bool = True
    course_days: float = 0.0


DRUGS: Final[tuple[Drug, ...]] = (
    Drug("METFORMIN", "A10BA02", "metformin", "860975",
         "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet"),
    Drug("INSULIN_GLARGINE", "A10AE04", "insulin glargine", "274783", "insulin glargine"),
    Drug("LISINOPRIL", "C09AA03", "lisinopril", "314076", "lisinopril 10 MG Oral Tablet"),
    Drug("LOSARTAN", "C09CA01", "losartan", "979492", "losartan potassium 50 MG Oral Tablet"),
    Drug("AMLODIPINE", "C08CA01", "amlodipine", "197361", "Amlodipine 5 MG Oral Tablet"),
    Drug("HCTZ", "C03AA03", "hydrochlorothiazide", "310798", "Hydrochlorothiazide 25 MG Oral Tablet"),
    Drug("SIMVASTATIN", "C10AA01", "simvastatin", "314231", "Simvastatin 10 MG Oral Tablet"),
    Drug("FUROSEMIDE", "C03CA01", "furosemide", "313988", "Furosemide 40 MG Oral Tablet"),
    Drug("CARVEDILOL", "C07AG02", "carvedilol", "200033", "carvedilol 25 MG Oral Tablet"),
    Drug("METOPROLOL", "C07AB02", "metoprolol", "6918", "metoprolol"),
    Drug("TIOTROPIUM", "R03BB04", "tiotropium bromide", "69120", "tiotropium"),
    Drug("SALBUTAMOL", "R03AC02", "salbutamol", "2123111",
         "NDA020503 200 ACTUAT Albuterol 0.09 MG/ACTUAT Metered Dose Inhaler"),
    Drug("FLUTICASONE", "R03BA05", "fluticasone", "895994",
         "120 ACTUAT Fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler"),
    Drug("SERTRALINE", "N06AB06", "sertraline", "36437", "sertraline"),
    Drug("CITALOPRAM", "N06AB04", "citalopram", "2556", "citalopram"),
    Drug("APIXABAN", "B01AF02", "apixaban", "1364430", "apixaban"),
    Drug("ASPIRIN", "B01AC06", "acetylsalicylic acid", "243670", "Aspirin 81 MG Oral Tablet"),
    Drug("CLOPIDOGREL", "B01AC04", "clopidogrel", "309362", "Clopidogrel 75 MG Oral Tablet"),
    Drug("NITROGLYCERIN", "C01DA02", "glyceryl trinitrate", "705129", "Nitroglycerin 0.4 MG/ACTUAT Mucosal Spray"),
    Drug("GALANTAMINE", "N06DA04", "galantamine", "310436", "Galantamine 4 MG Oral Tablet"),
    Drug("ALENDRONATE", "M05BA04", "alendronic acid", "904419", "Alendronic acid 10 MG Oral Tablet"),
    Drug("NICOTINE", "N07BA01", "nicotine", "7407", "nicotine", chronic=False, course_days=84),
    Drug("PARACETAMOL", "N02BE01", "paracetamol", "313782", "Acetaminophen 325 MG Oral Tablet", chronic=False,
         course_days=14),
    Drug("IBUPROFEN", "M01AE01", "ibuprofen", "310965", "Ibuprofen 200 MG Oral Tablet", chronic=False,
         course_days=10),
    Drug("AMOXICILLIN", "J01CA04", "amoxicillin", "308192", "Amoxicillin 500 MG Oral Tablet", chronic=False,
         course_days=7),
    Drug("AMOXICLAV", "J01CR02", "amoxicillin and beta-lactamase inhibitor", "562251",
         "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet", chronic=False, course_days=7),
    Drug("NITROFURANTOIN", "J01XE01", "nitrofurantoin", "311989", "Nitrofurantoin 5 MG/ML Oral Suspension",
         chronic=False, course_days=5),
    Drug("AZITHROMYCIN", "J01FA10", "azithromycin", "141962", "Azithromycin 250 MG Oral Capsule", chronic=False,
         course_days=5),
    Drug("OSELTAMIVIR", "J05AH02", "oseltamivir", "260101", "oseltamivir", chronic=False, course_days=5),
)
DRUG: Final = {d.key: i for i, d in enumerate(DRUGS)}

# Started at the visit where a chronic condition is diagnosed: (drug, probability), in order; alternatives are
# expressed by lower probabilities on the second choice.
ONSET_RX: Final[dict[str, tuple[tuple[str, float], ...]]] = {
    "SMOKER": (("NICOTINE", 0.15),),
    "HTN": (("LISINOPRIL", 0.55), ("AMLODIPINE", 0.35)),
    "T2D": (("METFORMIN", 0.9), ("SIMVASTATIN", 0.5)),
    "CKD": (("LOSARTAN", 0.4),),
    "HF": (("FUROSEMIDE", 0.85), ("CARVEDILOL", 0.6)),
    "COPD": (("TIOTROPIUM", 0.8), ("SALBUTAMOL", 0.9)),
    "ASTHMA": (("SALBUTAMOL", 0.95), ("FLUTICASONE", 0.5)),
    "DEPRESSION": (("SERTRALINE", 0.5), ("CITALOPRAM", 0.25)),
    "AF": (("APIXABAN", 0.7), ("METOPROLOL", 0.4)),
    "CAD": (("ASPIRIN", 0.8), ("SIMVASTATIN", 0.8), ("NITROGLYCERIN", 0.4)),
    "DEMENTIA": (("GALANTAMINE", 0.5),),
    "OSTEOPOROSIS": (("ALENDRONATE", 0.8),),
    "OA_KNEE": (("PARACETAMOL", 0.5), ("IBUPROFEN", 0.2)),
}
# Added at a later routine visit: (drug, needs condition, probability per visit).
FOLLOWUP_RX: Final[tuple[tuple[str, str, float], ...]] = (
    ("HCTZ", "HTN", 0.04),
    ("INSULIN_GLARGINE", "T2D", 0.015),
    ("SIMVASTATIN", "T2D", 0.05),
    ("SIMVASTATIN", "CAD", 0.1),
    ("LOSARTAN", "CKD", 0.03),
)


# --- measurements -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    """A lab test or vital sign: LOINC code, description, unit, decimals it is reported with."""

    key: str
    kind: str  # LAB or VITAL (the MEDS code kind); Synthea category laboratory / vital-signs
    loinc: str
    desc: str
    unit: str
    decimals: int


MEASURES: Final[tuple[Measure, ...]] = (
    Measure("HBA1C", "LAB", "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 1),
    Measure("EGFR", "LAB", "33914-3", "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum "
            "or Plasma by Creatinine-based formula (MDRD)", "mL/min/{1.73_m2}", 0),
    Measure("CREAT", "LAB", "2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 2),
    Measure("BNP", "LAB", "30934-4", "Natriuretic peptide B [Mass/volume] in Serum or Plasma", "pg/mL", 0),
    Measure("CHOL", "LAB", "2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 0),
    Measure("LDL", "LAB", "18262-6", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay", "mg/dL",
            0),
    Measure("HGB", "LAB", "718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 1),
    Measure("NA", "LAB", "2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 0),
    Measure("K", "LAB", "2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 1),
    Measure("WBC", "LAB", "6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 1),
    Measure("TROP", "LAB", "89579-7", "Troponin I.cardiac [Mass/volume] in Serum or Plasma by High sensitivity "
            "method", "ng/L", 0),
    Measure("CRP", "LAB", "1988-5", "C reactive protein [Mass/volume] in Serum or Plasma", "mg/L", 1),
    Measure("GLU", "LAB", "2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 0),
    Measure("LACT", "LAB", "2524-7", "Lactate [Moles/volume] in Serum or Plasma", "mmol/L", 1),
    Measure("SBP", "VITAL", "8480-6", "Systolic blood pressure", "mm[Hg]", 0),
    Measure("DBP", "VITAL", "8462-4", "Diastolic blood pressure", "mm[Hg]", 0),
    Measure("BMI", "VITAL", "39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", 1),
)


# --- hierarchy and titles of the parent codes --------------------------------------------------------------

ICD10_PARENTS: Final[dict[str, tuple[str, ...]]] = {
    "E669": ("E66",), "F17210": ("F1721", "F172", "F17"), "E119": ("E11",), "E11649": ("E1164", "E116", "E11"),
    "N189": ("N18",), "I509": ("I50",), "J449": ("J44",), "J441": ("J44",), "J45909": ("J4590", "J459", "J45"),
    "J45901": ("J4590", "J459", "J45"), "F329": ("F32",), "I4891": ("I489", "I48"), "I2510": ("I251", "I25"),
    "I252": ("I25",), "F0390": ("F039", "F03"), "M810": ("M81",), "M179": ("M17",), "Z8673": ("Z867", "Z86"),
    "Z8781": ("Z878", "Z87"), "Z96651": ("Z9665", "Z966", "Z96"), "Z9049": ("Z904", "Z90"), "J189": ("J18",),
    "J111": ("J11",), "N390": ("N39",), "A419": ("A41",), "I219": ("I21",), "I639": ("I63",),
    "S72009A": ("S72009", "S7200", "S720", "S72"), "W19XXXA": ("W19",), "N179": ("N17",), "K922": ("K92",),
    "R079": ("R07",), "L0390": ("L039", "L03"), "K3580": ("K358", "K35"), "K8020": ("K802", "K80"),
    "K4090": ("K409", "K40"), "J069": ("J06",), "J209": ("J20",), "M5450": ("M545", "M54"),
}
ICD10_TITLES: Final[dict[str, str]] = {
    "E66": "Overweight and obesity", "F1721": "Nicotine dependence, cigarettes", "F172": "Nicotine dependence",
    "F17": "Nicotine dependence", "E11": "Type 2 diabetes mellitus",
    "E1164": "Type 2 diabetes mellitus with hypoglycemia",
    "E116": "Type 2 diabetes mellitus with other specified complications", "N18": "Chronic kidney disease (CKD)",
    "I50": "Heart failure", "J44": "Other chronic obstructive pulmonary disease", "J4590": "Unspecified asthma",
    "J459": "Other and unspecified asthma", "J45": "Asthma", "F32": "Depressive episode",
    "I489": "Unspecified atrial fibrillation and atrial flutter", "I48": "Atrial fibrillation and flutter",
    "I251": "Atherosclerotic heart disease of native coronary artery", "I25": "Chronic ischemic heart disease",
    "F039": "Unspecified dementia", "F03": "Unspecified dementia",
    "M81": "Osteoporosis without current pathological fracture", "M17": "Osteoarthritis of knee",
    "Z867": "Personal history of diseases of circulatory system",
    "Z86": "Personal history of certain other diseases",
    "Z878": "Personal history of other specified conditions",
    "Z87": "Personal history of other diseases and conditions", "Z9665": "Presence of artificial knee joint",
    "Z966": "Presence of orthopedic joint implants", "Z96": "Presence of other functional implants",
    "Z904": "Acquired absence of other specified parts of digestive tract",
    "Z90": "Acquired absence of organs, not elsewhere classified", "J18": "Pneumonia, unspecified organism",
    "J11": "Influenza due to unidentified influenza virus", "N39": "Other disorders of urinary system",
    "A41": "Other sepsis", "I21": "Acute myocardial infarction", "I63": "Cerebral infarction",
    "S72009": "Fracture of unspecified part of neck of unspecified femur",
    "S7200": "Fracture of unspecified part of neck of femur", "S720": "Fracture of head and neck of femur",
    "S72": "Fracture of femur", "W19": "Unspecified fall", "N17": "Acute kidney failure",
    "K92": "Other diseases of digestive system", "R07": "Pain in throat and chest",
    "L039": "Cellulitis and acute lymphangitis, unspecified", "L03": "Cellulitis and acute lymphangitis",
    "K358": "Other and unspecified acute appendicitis", "K35": "Acute appendicitis",
    "K802": "Calculus of gallbladder without cholecystitis", "K80": "Cholelithiasis",
    "K409": "Unilateral inguinal hernia, without obstruction or gangrene", "K40": "Inguinal hernia",
    "J06": "Acute upper respiratory infections of multiple and unspecified sites", "J20": "Acute bronchitis",
    "M545": "Low back pain", "M54": "Dorsalgia",
}
ATC_TITLES: Final[dict[str, str]] = {
    "A": "Alimentary tract and metabolism", "A10": "Drugs used in diabetes", "A10A": "Insulins and analogues",
    "A10AE": "Insulins and analogues for injection, long-acting",
    "A10B": "Blood glucose lowering drugs, excl. insulins", "A10BA": "Biguanides",
    "B": "Blood and blood forming organs", "B01": "Antithrombotic agents", "B01A": "Antithrombotic agents",
    "B01AC": "Platelet aggregation inhibitors excl. heparin", "B01AF": "Direct factor Xa inhibitors",
    "C": "Cardiovascular system", "C01": "Cardiac therapy", "C01D": "Vasodilators used in cardiac diseases",
    "C01DA": "Organic nitrates", "C03": "Diuretics", "C03A": "Low-ceiling diuretics, thiazides",
    "C03AA": "Thiazides, plain", "C03C": "High-ceiling diuretics", "C03CA": "Sulfonamides, plain",
    "C07": "Beta blocking agents", "C07A": "Beta blocking agents", "C07AB": "Beta blocking agents, selective",
    "C07AG": "Alpha and beta blocking agents", "C08": "Calcium channel blockers",
    "C08C": "Selective calcium channel blockers with mainly vascular effects",
    "C08CA": "Dihydropyridine derivatives", "C09": "Agents acting on the renin-angiotensin system",
    "C09A": "ACE inhibitors, plain", "C09AA": "ACE inhibitors, plain",
    "C09C": "Angiotensin II receptor blockers (ARBs), plain",
    "C09CA": "Angiotensin II receptor blockers (ARBs), plain",
    "C10": "Lipid modifying agents", "C10A": "Lipid modifying agents, plain",
    "C10AA": "HMG CoA reductase inhibitors", "J": "Antiinfectives for systemic use",
    "J01": "Antibacterials for systemic use", "J01C": "Beta-lactam antibacterials, penicillins",
    "J01CA": "Penicillins with extended spectrum",
    "J01CR": "Combinations of penicillins, incl. beta-lactamase inhibitors",
    "J01F": "Macrolides, lincosamides and streptogramins", "J01FA": "Macrolides", "J01X": "Other antibacterials",
    "J01XE": "Nitrofuran derivatives", "J05": "Antivirals for systemic use", "J05A": "Direct acting antivirals",
    "J05AH": "Neuraminidase inhibitors", "M": "Musculo-skeletal system",
    "M01": "Antiinflammatory and antirheumatic products",
    "M01A": "Antiinflammatory and antirheumatic products, non-steroids", "M01AE": "Propionic acid derivatives",
    "M05": "Drugs for treatment of bone diseases", "M05B": "Drugs affecting bone structure and mineralization",
    "M05BA": "Bisphosphonates", "N": "Nervous system", "N02": "Analgesics",
    "N02B": "Other analgesics and antipyretics", "N02BE": "Anilides", "N06": "Psychoanaleptics",
    "N06A": "Antidepressants", "N06AB": "Selective serotonin reuptake inhibitors", "N06D": "Anti-dementia drugs",
    "N06DA": "Anticholinesterases", "N07": "Other nervous system drugs", "N07B": "Drugs used in addictive disorders",
    "N07BA": "Drugs used in nicotine dependence", "R": "Respiratory system",
    "R03": "Drugs for obstructive airway diseases", "R03A": "Adrenergics, inhalants",
    "R03AC": "Selective beta-2-adrenoreceptor agonists", "R03B": "Other drugs for obstructive airway diseases, "
    "inhalants", "R03BA": "Glucocorticoids", "R03BB": "Anticholinergics",
}


def atc_parents(atc: str) -> tuple[str, ...]:
    """ATC ancestors nearest first: A10BA02 -> A10BA, A10B, A10, A (levels of 5, 4, 3, 1 characters)."""
    return tuple(atc[:n] for n in (5, 4, 3, 1) if n < len(atc))


# --- the code vocabulary ----------------------------------------------------------------------------------


@dataclass
class Vocabulary:
    """Every code the simulator emits (index = code id used in the engine), with description and parents."""

    codes: list[str] = field(default_factory=list)
    descriptions: list[str | None] = field(default_factory=list)
    parents: list[list[str]] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)

    def add(self, code: str, description: str | None, parents: list[str] | None = None) -> int:
        if code in self.index:
            return self.index[code]
        self.index[code] = len(self.codes)
        self.codes.append(code)
        self.descriptions.append(description)
        self.parents.append(parents or [])
        return self.index[code]

    def metadata(self) -> list[tuple[str, str | None, list[str]]]:
        """(code, description, parent_codes) for every emitted code and every parent named by one."""
        rows = {c: (c, d, p) for c, d, p in zip(self.codes, self.descriptions, self.parents, strict=True)}
        for _, _, parents in list(rows.values()):
            for p in parents:
                if p not in rows:
                    _, vocab, value = p.split("//")
                    title = ICD10_TITLES.get(value) if vocab == "ICD10CM" else ATC_TITLES.get(value)
                    later = parents[parents.index(p) + 1:]
                    rows[p] = (p, title, list(later))
        return sorted(rows.values())


def dx_code(icd10: str) -> str:
    """``DX//ICD10CM//<code>``."""
    return make_code("DX", "ICD10CM", icd10)


def _build() -> tuple[Vocabulary, dict[str, int]]:
    v = Vocabulary()
    ids: dict[str, int] = {}

    def dx(icd: str, desc: str | None) -> int:
        return v.add(dx_code(icd), desc, [dx_code(p) for p in ICD10_PARENTS.get(icd, ())])

    ids["BIRTH"] = v.add(BIRTH_CODE, "Birth")
    ids["DEATH"] = v.add(DEATH_CODE, "Death")
    for sex, desc in (("F", "Female"), ("M", "Male")):
        ids[f"GENDER_{sex}"] = v.add(make_code("GENDER", sex), desc)
    for race in RACES:
        ids[f"RACE_{race}"] = v.add(make_code("RACE", race), f"Race: {race.lower()}")
    ids["ETH_HISPANIC"] = v.add(make_code("ETHNICITY", "HISPANIC"), "Hispanic or Latino")
    ids["ETH_NOT_HISPANIC"] = v.add(make_code("ETHNICITY", "NOT_HISPANIC"), "Not Hispanic or Latino")
    ids["GP"] = v.add(make_code("ENCOUNTER", "PRIMARY_CARE"), "Primary care visit")
    for admit in ("EMERGENCY", "ELECTIVE"):
        ids[f"ADMIT_{admit}"] = v.add(make_code("ADMIT", admit), f"Hospital admission, {admit.lower()}")
    for d in DISCHARGES:
        ids[f"DISCHARGE_{d}"] = v.add(make_code("DISCHARGE", d), DISCHARGE_DESC[d])
    ids["ICU_ADMIT"] = v.add(make_code("ICU", "ADMIT"), "ICU stay admission")
    ids["ICU_DISCHARGE"] = v.add(make_code("ICU", "DISCHARGE"), "ICU stay discharge")
    for c in CONDITIONS:
        ids[f"COND_{c.name}"] = dx(c.icd10, c.icd10_desc)
    for cause in CAUSES:
        ids[f"CAUSE_{cause.name}"] = dx(cause.icd10, cause.icd10_desc)
        if cause.procedure is not None:
            ids[f"PX_{cause.name}"] = v.add(make_code("PX", "ICD10PCS", cause.procedure.pcs), cause.procedure.pcs_desc)
    for cause in CAUSES:
        for extra in cause.extra_dx:
            ids[f"DX_{extra}"] = dx(extra, "Unspecified fall, initial encounter" if extra == "W19XXXA" else None)
    for a in ACUTES:
        ids[f"ACUTE_{a.name}"] = dx(a.icd10, a.icd10_desc)
    for d in DRUGS:
        ids[f"RX_{d.key}"] = v.add(make_code("RX", "ATC", d.atc), d.atc_desc,
                                   [make_code("RX", "ATC", p) for p in atc_parents(d.atc)])
    for m in MEASURES:
        ids[f"M_{m.key}"] = v.add(make_code(m.kind, "LOINC", m.loinc), f"{m.desc} ({m.unit})")
    return v, ids


RACES: Final = ("WHITE", "BLACK", "ASIAN", "OTHER")
VOCAB, CODE_ID = _build()


def _bit_evidence() -> dict[str, int]:
    """Code -> bitmask of the condition bits the code proves (the oracle's state rebuild)."""
    ev: dict[str, int] = {}

    def add(code: str, *bits: str) -> None:
        for b in bits:
            ev[code] = ev.get(code, 0) | (1 << BIT[b])

    for c in CONDITIONS:
        add(dx_code(c.icd10), c.name)
    add(dx_code("I219"), "HX_MI")
    add(dx_code("I639"), "HX_STROKE")
    add(dx_code("S72009A"), "HX_HIP_FRACTURE")
    add(dx_code("E11649"), "T2D")
    add(dx_code("J441"), "COPD")
    add(dx_code("J45901"), "ASTHMA")
    add(make_code("PX", "ICD10PCS", _KNEE.pcs), "KNEE_REPLACED")
    add(make_code("PX", "ICD10PCS", _CHOLE.pcs), "NO_GALLBLADDER")
    return ev


BIT_EVIDENCE: Final = _bit_evidence()
